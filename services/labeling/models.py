"""Labeling's tables: datasets as ingestion configured them, tasks, annotators, leases, annotations, snapshots."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import declarative_base

Base = declarative_base()


def utcnow() -> datetime:
    return datetime.now(UTC)


class LabelingDataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(40), index=True)
    name: Mapped[str] = mapped_column(String(200))
    task_type: Mapped[str] = mapped_column(String(40))
    labels: Mapped[list[str]] = mapped_column(JSON)
    overlap: Mapped[int] = mapped_column(Integer)
    retrain_threshold: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Labeling's own settings (not ingestion's): model assistance and consensus.
    auto_accept_threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    min_agreement: Mapped[float] = mapped_column(Float, default=0.5)
    max_extra_annotations: Mapped[int] = mapped_column(Integer, default=2)
    # What the retrain policy asks training for: base model and hyper-parameters (training's defaults if unset).
    training_base_model: Mapped[str | None] = mapped_column(String(100), nullable=True)
    training_hyperparameters: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    # Retrain policy state: consensus labels since the last snapshot (reset when one is taken).
    labels_since_snapshot: Mapped[int] = mapped_column(Integer, default=0)
    # The model serving this dataset in production, learned from `model.promoted`.
    production_model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    production_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # The PII rule its production tasks' text was last redacted with (`{"entities": ...}`, redaction.py), learned
    # from `dataset.changed`; None while the policy is off (or not yet carried by the event).
    pii_redacted_with: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    # Ingestion's settings as of this revision of the dataset (the newest an event carried; None: an event from
    # before revisions were carried), and its PII policy then (None: no event carried it yet; ask ingestion).
    config_revision: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pii_policy: Mapped[str | None] = mapped_column(String(10), nullable=True)
    pii_entities: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class Task(Base):
    """One item to label. `required` grows when a tie or low agreement escalates it."""

    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[str] = mapped_column(String(60), unique=True)
    tenant: Mapped[str] = mapped_column(String(40), index=True)
    dataset_id: Mapped[str] = mapped_column(String(40), index=True)
    kind: Mapped[str] = mapped_column(String(10))
    bucket: Mapped[str] = mapped_column(String(63))
    object_key: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64))
    offset: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    length: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    source: Mapped[str] = mapped_column(String(20), default="ingestion")  # ingestion | feedback | sample
    prediction_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    """The served prediction this item came from (feedback, or production traffic sampled for labeling): its
    consensus is sent back to inference as that prediction's ground truth (`prediction.labeled`)."""
    status: Mapped[str] = mapped_column(String(20), default="open", index=True)  # open|done|review|withdrawn
    priority: Mapped[int] = mapped_column(Integer, default=0)
    required: Mapped[int] = mapped_column(Integer, default=1)
    # Model assistance: the current model's guess, shown as a pre-label; uncertainty orders the queue.
    prelabel: Mapped[str | None] = mapped_column(String(200), nullable=True)
    prelabel_confidence: Mapped[float | None] = mapped_column(Float, nullable=True)
    prelabel_model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    prelabel_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    prelabel_spans: Mapped[list[dict] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    """token_classification: the model's entities `{start, end, label}` shown as pre-labels (None: no guess)."""
    uncertainty: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    feedback: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    consensus_label: Mapped[str | None] = mapped_column(String(200), nullable=True)
    consensus_spans: Mapped[list[dict] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    """token_classification: the entities consensus kept, in text order (`[]`: the item has none)."""
    consensus_source: Mapped[str | None] = mapped_column(String(20), nullable=True)  # vote | model_auto
    agreement: Mapped[float | None] = mapped_column(Float, nullable=True)
    consensus_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Annotator(Base):
    __tablename__ = "annotators"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(40), index=True)
    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    datasets: Mapped[list[str]] = mapped_column(JSON)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Lease(Base):
    """A task handed to an annotator until `expires_at`; an abandoned one simply expires."""

    __tablename__ = "leases"
    __table_args__ = (UniqueConstraint("task_id", "annotator_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    annotator_id: Mapped[str] = mapped_column(String(40), index=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class Annotation(Base):
    """A label (or, for token classification, a set of entity spans) from a person (`human`), the partner's push
    (`partner`), or a skip."""

    __tablename__ = "annotations"
    __table_args__ = (UniqueConstraint("task_id", "annotator_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    annotator_id: Mapped[str] = mapped_column(String(40))
    source: Mapped[str] = mapped_column(String(20))  # human | partner
    label: Mapped[str | None] = mapped_column(String(200), nullable=True)
    spans: Mapped[list[dict] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    """token_classification: the entities marked, `{start, end, label}` in text order (`[]`: none; None: a skip)."""
    skipped: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class Snapshot(Base):
    """An immutable dataset version: the manifest in object storage and what is in it."""

    __tablename__ = "snapshots"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(40), index=True)
    dataset_id: Mapped[str] = mapped_column(String(40), index=True)
    status: Mapped[str] = mapped_column(String(20), default="pending")  # pending | ready | failed
    reason: Mapped[str] = mapped_column(String(40))  # manual | retrain_policy | monitoring
    training_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    """Why the training it requests runs, when not the label-count policy (a monitoring alert's reason)."""
    trigger_training: Mapped[bool] = mapped_column(Boolean, default=False)
    manifest_key: Mapped[str | None] = mapped_column(String(512), nullable=True)
    manifest_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    item_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    label_counts: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    split_counts: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    # split -> shared.artifacts.item_ids_sha256 of its item ids (None on snapshots from before the test split)
    split_sha256: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    failure: Mapped[str | None] = mapped_column(Text, nullable=True)
    trace_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    erased_items: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """How many of its items were erased since it was taken (services/labeling/erasure.py): its manifest still
    names them, their content is gone, so a training run on it fails; take a new snapshot. None: none erased."""
