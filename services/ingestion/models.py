"""Ingestion's tables: partners (tenants), their API keys (hashed), datasets and raw items."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Date,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from shared.auth import SCOPES, normalise_scopes
from shared.db import declarative_base

Base = declarative_base()


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def utcnow() -> datetime:
    return datetime.now(UTC)


class Partner(Base):
    __tablename__ = "partners"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ptn"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    daily_item_quota: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    daily_byte_quota: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # fair use (services/ingestion/quotas.py): requests per second per key and per tenant, null = the default
    rate_limits: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    monthly_quotas: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # meter -> limit per UTC month
    item_retention_days: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """Raw items older than this are erased by the retention sweep (services/ingestion/erasure.py); null: kept."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    partner_id: Mapped[str] = mapped_column(ForeignKey("partners.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(12))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Nullable, so that keys from before scopes and expiry gain the columns without a migration step: a NULL
    # `scopes` is every scope (shared.auth.normalise_scopes), a NULL `expires_at` never expires.
    scopes: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    """Written at most once per `LAST_USED_RESOLUTION` per key, when a key check misses the verifiers' caches."""
    replaces: Mapped[str | None] = mapped_column(String(40), nullable=True)
    """The key this one rotated out (which then expires after the rotation's grace period)."""

    @property
    def granted_scopes(self) -> list[str]:
        granted = normalise_scopes(self.scopes)
        return [scope for scope in SCOPES if scope in granted]


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("tenant", "name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ds"))
    tenant: Mapped[str] = mapped_column(ForeignKey("partners.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    task_type: Mapped[str] = mapped_column(String(40))
    labels: Mapped[list[str]] = mapped_column(JSON)
    pii_policy: Mapped[str] = mapped_column(String(10), default="off")
    pii_entities: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    """The tenant's token model whose entities of these labels are PII too (`{"model", "labels"}`), None: none."""
    overlap: Mapped[int] = mapped_column(Integer, default=1)
    retrain_threshold: Mapped[int | None] = mapped_column(Integer, nullable=True)
    revision: Mapped[int | None] = mapped_column(Integer, nullable=True, default=1)
    """1 when created, one more at every change; `dataset.changed` carries it, so a consumer keeps the newest
    settings whatever order events arrive in. Nullable: a dataset from before it counts as revision 1."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    @property
    def current_revision(self) -> int:
        return self.revision or 1

    def config(self) -> dict:
        """The dataset as the event catalog's DatasetConfig: what labeling needs to know of it."""
        return {
            "dataset_id": self.id,
            "name": self.name,
            "task_type": self.task_type,
            "labels": list(self.labels),
            "overlap": self.overlap,
            "retrain_threshold": self.retrain_threshold,
            "pii_policy": self.pii_policy,
            "pii_entities": self.pii_entities,
            "revision": self.current_revision,
        }


class Item(Base):
    __tablename__ = "items"
    __table_args__ = (UniqueConstraint("dataset_id", "sha256"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("itm"))
    tenant: Mapped[str] = mapped_column(String(40), index=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), index=True)
    kind: Mapped[str] = mapped_column(String(10))
    sha256: Mapped[str] = mapped_column(String(64))
    content_type: Mapped[str] = mapped_column(String(100))
    bucket: Mapped[str] = mapped_column(String(63))
    object_key: Mapped[str] = mapped_column(String(512))
    object_sha256: Mapped[str] = mapped_column(String(64))
    offset: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    length: Mapped[int] = mapped_column(BigInteger)
    label: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # token_classification: the entity spans [{start, end, label}] (code point offsets), None when unlabeled.
    spans: Mapped[list | None] = mapped_column(JSON, nullable=True)
    item_metadata: Mapped[dict] = mapped_column("metadata", JSON, default=dict)
    redactions: Mapped[dict] = mapped_column(JSON, default=dict)
    push_id: Mapped[str] = mapped_column(String(40), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    subject_id: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    """The partner-given data subject the item is about: `DELETE /v1/subjects/{id}` erases all of them."""


class Erasure(Base):
    """One erasure (an item's, a data subject's, or a retention sweep's) and its report: each service's part is
    an `ErasureStep`; the erasure is completed when every step it expects has reported."""

    __tablename__ = "erasures"
    __table_args__ = (Index("ix_erasures_tenant_created", "tenant", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ers"))
    tenant: Mapped[str] = mapped_column(String(40))
    kind: Mapped[str] = mapped_column(String(20))  # item | subject | retention
    subject_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    item_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    cutoff: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    """retention: items created before this were erased."""
    status: Mapped[str] = mapped_column(String(20), default="running")  # running | completed
    expected: Mapped[list] = mapped_column(JSON, default=list)
    """The steps `{service, step}` the report waits for (the ones set off so far)."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ErasureStep(Base):
    """One service's finished part of an erasure, with what it removed; unique, so a redelivery adds nothing."""

    __tablename__ = "erasure_steps"
    __table_args__ = (UniqueConstraint("erasure_id", "service", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    erasure_id: Mapped[str] = mapped_column(ForeignKey("erasures.id"), index=True)
    service: Mapped[str] = mapped_column(String(20))
    step: Mapped[str] = mapped_column(String(100))
    counts: Mapped[dict] = mapped_column(JSON, default=dict)
    completed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Usage(Base):
    """Per partner and UTC day: what was accepted. The basis of quotas and billing."""

    __tablename__ = "usage"
    __table_args__ = (UniqueConstraint("tenant", "day"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(40), index=True)
    day: Mapped[date] = mapped_column(Date)
    items: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    pushes: Mapped[int] = mapped_column(BigInteger, default=0)
    duplicates: Mapped[int] = mapped_column(BigInteger, default=0)
    rejected: Mapped[int] = mapped_column(BigInteger, default=0)


class UsageRecord(Base):
    """The meter store: one row per usage record of every service (its own pushes, the others' events),
    unique per (tenant, record id), so a redelivered or replayed record is never counted twice."""

    __tablename__ = "usage_records"
    __table_args__ = (UniqueConstraint("tenant", "record_id"), Index("ix_usage_records_tenant_time", "tenant", "time"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(64))
    record_id: Mapped[str] = mapped_column(String(200))
    meter: Mapped[str] = mapped_column(String(40))
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    value: Mapped[float] = mapped_column(Double)
    # the dimensions reports group by, as columns; all of them (device, dataset_id...) in `dimensions`
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    version: Mapped[str | None] = mapped_column(String(20), nullable=True)
    dimensions: Mapped[dict] = mapped_column(JSON, default=dict)
    source: Mapped[str] = mapped_column(String(40))
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class IdempotencyRecord(Base):
    """The first response to a request made with an Idempotency-Key, replayed to its retries."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("tenant", "key"), Index("ix_idempotency_keys_created_at", "created_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(40))
    key: Mapped[str] = mapped_column(String(200))
    request_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    response: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    """When the key was claimed (or last taken over): the in-progress bound and the retention window count from
    it, and the request holding the claim finishes only while it is unchanged (services/ingestion/idempotency.py)."""


class Import(Base):
    """A bulk import: the uploaded file (JSONL or zip of images) and the worker's progress through it, and what it
    holds of its tenant's items and bytes quotas while it runs (services/ingestion/quotas.py)."""

    __tablename__ = "imports"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("imp"))
    tenant: Mapped[str] = mapped_column(String(40), index=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), index=True)
    format: Mapped[str] = mapped_column(String(10))
    object_key: Mapped[str] = mapped_column(String(512))
    size: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(20), default="queued")
    total: Mapped[int | None] = mapped_column(Integer, nullable=True)
    processed: Mapped[int] = mapped_column(Integer, default=0)
    accepted: Mapped[int] = mapped_column(Integer, default=0)
    duplicates: Mapped[int] = mapped_column(Integer, default=0)
    rejected: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[list] = mapped_column(JSON, default=list)
    failure: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    """A failed import's refusal as an error answer would carry it: `{code, message, details}` (a quota's meter)."""
    # The room a running import holds of its tenant's item and byte quotas (monthly and daily), written in the
    # transaction that admits it, spent by each batch's transaction and nulled in the one that finishes it; it
    # counts for every other push and import until `held_until`, which each batch moves on (a dead worker's
    # hold lapses). Nullable: imports from before holds lived here hold nothing.
    held_items: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    held_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    held_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    trace_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
