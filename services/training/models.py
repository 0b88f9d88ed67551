"""Training's tables: one row per training run, which is also the run's lease and live progress record, and
one row per trial of a run's recipe search.

A run row is written when a run is requested (by `training.requested` or `POST /v1/runs`) and updated by
whichever process executes it: the lease columns say which process holds the run right now (and until when,
renewed by a heartbeat), the progress columns say how far it got, and the terminal columns say how it ended.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from shared.db import declarative_base

Base = declarative_base()

QUEUED = "queued"
RUNNING = "running"
CANCELLING = "cancelling"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"

STATUSES = (QUEUED, RUNNING, CANCELLING, SUCCEEDED, FAILED, CANCELLED)
ACTIVE_STATUSES = (QUEUED, RUNNING, CANCELLING)
TERMINAL_STATUSES = (SUCCEEDED, FAILED, CANCELLED)

LAUNCH_QUEUE = "queue"
"""The run is sent to the training worker's queue (`training.run`)."""
LAUNCH_EXTERNAL = "external"
"""The run is executed by a launcher outside the worker (a `torchrun` Job running `services.training.distributed`)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


class TrainingRun(Base):
    __tablename__ = "training_runs"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    dataset_id: Mapped[str] = mapped_column(String(64), index=True)
    snapshot_id: Mapped[str] = mapped_column(String(64))
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    task_type: Mapped[str] = mapped_column(String(40))
    labels: Mapped[list[str]] = mapped_column(JSON)
    model_name: Mapped[str] = mapped_column(String(100), index=True)
    base_model: Mapped[str] = mapped_column(String(100))
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    reason: Mapped[str] = mapped_column(String(500))
    source: Mapped[str] = mapped_column(String(20))  # "event" or "api"
    launch: Mapped[str] = mapped_column(String(20), default=LAUNCH_QUEUE)
    trace_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    active_key: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    """Dedupe key of an identical request (same snapshot, model, base model, hyper-parameters); cleared when
    the run fails or is cancelled so that the same request may be tried again."""

    status: Mapped[str] = mapped_column(String(20), default=QUEUED, index=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    failure_reason: Mapped[str | None] = mapped_column(Text, nullable=True)

    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    """When the run was last sent to the training queue; None while it waits for one of its tenant's running
    slots (see `limits.py`), and for a run an external launcher executes."""
    lease_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    resumed_from_epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    world_size: Mapped[int] = mapped_column(Integer, default=1)
    device: Mapped[str | None] = mapped_column(String(40), nullable=True)
    base_weights: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)

    epoch: Mapped[int] = mapped_column(Integer, default=0)
    epochs: Mapped[int] = mapped_column(Integer, default=0)
    step: Mapped[int] = mapped_column(Integer, default=0)
    steps: Mapped[int] = mapped_column(Integer, default=0)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    samples_per_second: Mapped[float | None] = mapped_column(Float, nullable=True)
    eta_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    history: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    artifacts: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    search: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    """A run with a recipe search: `settings` (as resolved), `state` (searching, chosen, failed), `started_at`,
    `finished_at`, `seconds` and `chosen` (the winning trial); its trials are rows of `training_trials`."""
    trials: Mapped[list[TrainingTrial]] = relationship(
        "TrainingTrial", order_by="TrainingTrial.number", lazy="selectin", viewonly=True
    )

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    @property
    def progress(self) -> dict[str, Any]:
        names = ("epoch", "epochs", "step", "steps", "loss", "samples_per_second", "eta_seconds")
        return {name: getattr(self, name) for name in names}

    @property
    def baseline(self) -> dict[str, Any] | None:
        """The classical baseline on the test split, once the run has published (`comparison.py`)."""
        return (self.metrics or {}).get("baseline")

    @property
    def baseline_lift(self) -> float | None:
        """The candidate's test macro-F1 minus the classical baseline's, once the run has published."""
        return (self.metrics or {}).get("baseline_lift")

    @property
    def search_record(self) -> dict[str, Any] | None:
        """The search as the run API shows it: its settings and state, and every trial."""
        if self.search is None:
            return None
        return {**self.search, "trials": self.trials}


TRIAL_WAITING = "waiting"
TRIAL_RUNNING = "running"
TRIAL_COMPLETE = "complete"
TRIAL_PRUNED = "pruned"
TRIAL_FAILED = "failed"
TRIAL_SKIPPED = "skipped"
TRIAL_STATES = (TRIAL_WAITING, TRIAL_RUNNING, TRIAL_COMPLETE, TRIAL_PRUNED, TRIAL_FAILED, TRIAL_SKIPPED)
TRIAL_ENDED = (TRIAL_COMPLETE, TRIAL_PRUNED, TRIAL_FAILED, TRIAL_SKIPPED)


class TrainingTrial(Base):
    """One trial of a run's recipe search: a slot created when the search starts, taken by whichever worker
    (or the run's own execution) gets to it first, and ended once: complete, pruned, failed or skipped."""

    __tablename__ = "training_trials"
    __table_args__ = (UniqueConstraint("run_id", "number"),)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(40), ForeignKey("training_runs.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(20), default=TRIAL_WAITING)
    owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    study_trial: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """The trial's number in the run's optuna study."""
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    history: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    """Per epoch: `epoch`, validation `macro_f1` (what optuna was told) and `val_loss`."""
    validation_macro_f1: Mapped[float | None] = mapped_column(Float, nullable=True)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
