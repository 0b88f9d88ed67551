"""A run's life in the database: requested, leased, making progress, and ended exactly once.

- **Requests are idempotent.** An identical request (tenant, dataset, snapshot, model name, base model,
  hyper-parameters) while one is queued, running or succeeded returns that run (`active_key` is unique);
  a failed or cancelled run clears its key, so the same request can be tried again.
- **Executing needs the lease.** Whoever executes a run (the worker's `training.run` task, or rank 0 of a
  torchrun job) first takes its lease: `lease_owner` = host:pid:token, renewed by a heartbeat every few
  seconds until `lease_expires_at`. A redelivered task that finds the lease alive does not train; it tries
  again later (`Outcome.HELD`), and takes over only once the holder is gone: its lease expired, or it was a
  process on this host that no longer exists (a SIGKILLed worker), which is detected at once.
- **A run ends once.** Success, failure and cancellation are conditional updates that only the lease holder
  (or nobody, for a run that never started) can make, and each publishes its event in the same transaction:
  one `training.completed`, or one `training.failed` with a reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from services.training.models import (
    ACTIVE_STATUSES,
    CANCELLED,
    CANCELLING,
    FAILED,
    LAUNCH_QUEUE,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL_STATUSES,
    TrainingRun,
    utcnow,
)
from shared.errors import Conflict
from shared.logging import get_logger
from shared.runtime import Runtime

log = get_logger(__name__)

RUN_TASK = "training.run"
RUN_QUEUE = "training"
LEASE_SECONDS = 30.0
HEARTBEAT_SECONDS = 2.0

_HOST = socket.gethostname()
_LIVE_OWNERS: set[str] = set()
"""Leases held by executions running in this process right now."""
_LIVE_LOCK = threading.Lock()


@dataclass(frozen=True)
class RunRequest:
    tenant: str
    dataset_id: str
    snapshot_id: str
    manifest: dict[str, Any]
    task_type: str
    labels: list[str]
    model_name: str
    base_model: str
    hyperparameters: dict[str, Any]
    reason: str
    source: str
    launch: str = LAUNCH_QUEUE
    trace_id: str | None = None

    def key(self) -> str:
        identity = [
            self.tenant,
            self.dataset_id,
            self.snapshot_id,
            self.model_name,
            self.base_model,
            self.hyperparameters,
        ]
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class RunInfo:
    """What an execution needs to know about its run (a plain copy, safe to pass between processes)."""

    id: str
    tenant: str
    dataset_id: str
    snapshot_id: str
    manifest: dict[str, Any]
    task_type: str
    labels: list[str]
    model_name: str
    base_model: str
    hyperparameters: dict[str, Any]
    trace_id: str | None
    attempts: int

    @classmethod
    def of(cls, run: TrainingRun) -> RunInfo:
        return cls(
            id=run.id,
            tenant=run.tenant,
            dataset_id=run.dataset_id,
            snapshot_id=run.snapshot_id,
            manifest=dict(run.manifest),
            task_type=run.task_type,
            labels=list(run.labels),
            model_name=run.model_name,
            base_model=run.base_model,
            hyperparameters=dict(run.hyperparameters),
            trace_id=run.trace_id,
            attempts=run.attempts,
        )


def new_run_id() -> str:
    return f"run_{uuid.uuid4().hex[:20]}"


def _aware(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every time here is UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


# ------------------------------------------------------------------------------------------- requesting


def create_run(session: Session, request: RunRequest, *, force: bool = False) -> tuple[TrainingRun, bool]:
    """Record a queued run, or return the identical one already active or succeeded (and False)."""
    key = None if force else request.key()
    if key is not None:
        existing = session.scalar(select(TrainingRun).where(TrainingRun.active_key == key))
        if existing is not None:
            return existing, False
    run = TrainingRun(
        id=new_run_id(),
        tenant=request.tenant,
        dataset_id=request.dataset_id,
        snapshot_id=request.snapshot_id,
        manifest=request.manifest,
        task_type=request.task_type,
        labels=list(request.labels),
        model_name=request.model_name,
        base_model=request.base_model,
        hyperparameters=request.hyperparameters,
        reason=request.reason[:500],
        source=request.source,
        launch=request.launch,
        trace_id=request.trace_id,
        active_key=key,
        status=QUEUED,
        cancel_requested=False,
        attempts=0,
        world_size=1,
        epochs=request.hyperparameters.get("epochs", 0),
        history=[],
    )
    session.add(run)
    session.flush()
    return run, True


def record_rejected(runtime: Runtime, session: Session, request: RunRequest, reason: str) -> TrainingRun:
    """A request that cannot run (bad hyper-parameters, unknown base model): a failed run, and its event."""
    run, _ = create_run(session, request, force=True)
    _finish(runtime, session, run, FAILED, reason)
    return run


def dispatch(runtime: Runtime, session: Session, run_id: str) -> None:
    """Queue the run for the training worker through the outbox, in the caller's transaction: it is sent when
    that transaction commits, or by the outbox relay once Redis answers again (by task name: the API process
    never imports torch)."""
    runtime.bus.enqueue(session, RUN_TASK, [run_id], queue=RUN_QUEUE)
    log.info("run_dispatched", run_id=run_id)


def request_cancel(runtime: Runtime, session: Session, run: TrainingRun, *, who: str) -> None:
    if run.status in TERMINAL_STATUSES:
        raise Conflict(f"run {run.id} has already {run.status}; there is nothing to cancel")
    run.cancel_requested = True
    if run.status == QUEUED and not _lease_alive(run, utcnow()):
        _finish(runtime, session, run, CANCELLED, f"cancelled by {who} before it started")
    else:
        run.status = CANCELLING
    log.info("run_cancel_requested", run_id=run.id, status=run.status, by=who)


# --------------------------------------------------------------------------------------------- the lease


def new_lease_owner() -> str:
    return f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _owner_gone(owner: str) -> bool:
    """True when the holder is provably dead: a process on this host that no longer runs, or an execution
    of this very process that has ended. Holders on other hosts are trusted until their lease expires."""
    host, _, rest = owner.partition(":")
    pid_text, _, _ = rest.partition(":")
    if host != _HOST or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        with _LIVE_LOCK:
            return owner not in _LIVE_OWNERS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _lease_alive(run: TrainingRun, now: datetime) -> bool:
    if not run.lease_owner:
        return False
    expires = _aware(run.lease_expires_at)
    return expires is not None and expires > now and not _owner_gone(run.lease_owner)


@dataclass(frozen=True)
class Claim:
    outcome: str  # acquired | held | finished | missing | cancelled
    run: RunInfo | None = None
    resumed_after: str | None = None


def claim(runtime: Runtime, run_id: str, owner: str, *, world_size: int = 1) -> Claim:
    """Take the run's lease if nobody alive holds it."""
    now = utcnow()
    with runtime.db.session() as session:
        run = session.scalar(select(TrainingRun).where(TrainingRun.id == run_id).with_for_update())
        if run is None:
            return Claim("missing")
        if run.status in TERMINAL_STATUSES:
            return Claim("finished")
        if _lease_alive(run, now):
            return Claim("held")
        if run.cancel_requested:
            _finish(runtime, session, run, CANCELLED, "cancelled by an operator; the run stopped")
            return Claim("cancelled")
        previous = run.lease_owner
        run.lease_owner = owner
        run.lease_expires_at = now + timedelta(seconds=LEASE_SECONDS)
        run.status = RUNNING
        run.attempts += 1
        run.world_size = world_size
        run.started_at = run.started_at or now
        info = RunInfo.of(run)
    with _LIVE_LOCK:
        _LIVE_OWNERS.add(owner)
    return Claim("acquired", info, resumed_after=previous)


def forget_owner(owner: str) -> None:
    with _LIVE_LOCK:
        _LIVE_OWNERS.discard(owner)


def release(runtime: Runtime, run_id: str, owner: str) -> None:
    """Give the lease up without ending the run (a transient error: another attempt will take it)."""
    with runtime.db.session() as session:
        session.execute(
            update(TrainingRun)
            .where(TrainingRun.id == run_id, TrainingRun.lease_owner == owner)
            .values(lease_owner=None, lease_expires_at=None)
        )


@dataclass
class LiveProgress:
    """The latest numbers of an execution, written by the heartbeat (cheap to update every step)."""

    step: int = 0
    steps: int = 0
    loss: float | None = None
    samples_per_second: float | None = None
    eta_seconds: float | None = None

    def values(self) -> dict[str, Any]:
        """The numbers known so far (an unknown one never overwrites what an epoch recorded)."""
        values = {
            "step": self.step,
            "steps": self.steps,
            "loss": self.loss,
            "samples_per_second": self.samples_per_second,
            "eta_seconds": self.eta_seconds,
        }
        return {name: value for name, value in values.items() if value is not None}


class Heartbeat:
    """Renews the lease and publishes live progress every few seconds; notices cancellation and takeover."""

    def __init__(self, runtime: Runtime, run_id: str, owner: str, progress: LiveProgress) -> None:
        self.runtime = runtime
        self.run_id = run_id
        self.owner = owner
        self.progress = progress
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{run_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self.beat()
            except Exception as exc:  # a missed beat is survivable until the lease expires
                log.warning("run_heartbeat_failed", run_id=self.run_id, error=str(exc)[:300])

    def beat(self) -> None:
        with self.runtime.db.session() as session:
            renewed = session.execute(
                update(TrainingRun)
                .where(TrainingRun.id == self.run_id, TrainingRun.lease_owner == self.owner)
                .values(lease_expires_at=utcnow() + timedelta(seconds=LEASE_SECONDS), **self.progress.values())
            ).rowcount
            cancel = session.scalar(select(TrainingRun.cancel_requested).where(TrainingRun.id == self.run_id))
        if not renewed:
            self.lost.set()
        if cancel:
            self.cancelled.set()


# ----------------------------------------------------------------------------------------------- progress


def _held(session: Session, run_id: str, owner: str) -> TrainingRun | None:
    run = session.scalar(select(TrainingRun).where(TrainingRun.id == run_id).with_for_update())
    if run is None or run.lease_owner != owner or run.status not in (RUNNING, CANCELLING):
        return None
    return run


def record_start(runtime: Runtime, run_id: str, owner: str, **values: Any) -> bool:
    with runtime.db.session() as session:
        run = _held(session, run_id, owner)
        if run is None:
            return False
        for name, value in values.items():
            setattr(run, name, value)
    return True


def record_epoch(
    runtime: Runtime, run_id: str, owner: str, history: list[dict[str, Any]], metrics: dict[str, Any]
) -> bool:
    """The epochs so far (the same list the checkpoint holds), and the latest validation numbers."""
    report = history[-1]
    with runtime.db.session() as session:
        run = _held(session, run_id, owner)
        if run is None:
            return False
        run.epoch = report["epoch"]
        run.epochs = report["epochs"]
        run.step = run.steps
        run.loss = report["train_loss"]
        run.samples_per_second = report["samples_per_second"]
        run.eta_seconds = report["eta_seconds"]
        run.history = list(history)
        run.metrics = metrics
        run.lease_expires_at = utcnow() + timedelta(seconds=LEASE_SECONDS)
    return True


# ------------------------------------------------------------------------------------------------- ending


def complete(runtime: Runtime, run_id: str, owner: str, *, payload: dict[str, Any], metrics: dict[str, Any]) -> str:
    """Mark the run succeeded and publish `training.completed`, atomically. Returns the status it ended in
    (a cancellation that arrived during export wins) or "" if this execution no longer holds the run."""
    with runtime.db.session() as session:
        run = _held(session, run_id, owner)
        if run is None:
            return ""
        if run.cancel_requested:
            _finish(runtime, session, run, CANCELLED, "cancelled by an operator before the model was published")
            return CANCELLED
        run.metrics = metrics
        run.artifacts = payload["artifacts"]
        _finish(runtime, session, run, SUCCEEDED, None, payload=payload)
    return SUCCEEDED


def fail(runtime: Runtime, run_id: str, owner: str | None, reason: str) -> bool:
    with runtime.db.session() as session:
        if owner is None:
            run = session.scalar(select(TrainingRun).where(TrainingRun.id == run_id).with_for_update())
            run = run if run is not None and run.status in ACTIVE_STATUSES else None
        else:
            run = _held(session, run_id, owner)
        if run is None:
            return False
        _finish(runtime, session, run, FAILED, reason)
    return True


def cancelled(runtime: Runtime, run_id: str, owner: str, reason: str) -> bool:
    with runtime.db.session() as session:
        run = _held(session, run_id, owner)
        if run is None:
            return False
        _finish(runtime, session, run, CANCELLED, reason)
    return True


def _finish(
    runtime: Runtime,
    session: Session,
    run: TrainingRun,
    status: str,
    reason: str | None,
    *,
    payload: dict[str, Any] | None = None,
) -> None:
    now = utcnow()
    run.status = status
    run.failure_reason = reason
    run.finished_at = now
    run.lease_owner = None
    run.lease_expires_at = None
    run.eta_seconds = 0.0 if status == SUCCEEDED else None
    if status != SUCCEEDED:
        run.active_key = None  # the same request may be made again
    if status == SUCCEEDED:
        runtime.bus.publish(session, "training.completed", payload or {}, tenant=run.tenant, trace_id=run.trace_id)
    else:
        failure = {
            "run_id": run.id,
            "dataset_id": run.dataset_id,
            "snapshot_id": run.snapshot_id,
            "reason": reason,
            "outcome": status,
        }
        runtime.bus.publish(session, "training.failed", failure, tenant=run.tenant, trace_id=run.trace_id)
    log.info(f"run_{status}", run_id=run.id, reason=reason)


# ----------------------------------------------------------------------------------------------- recovery


def recover(runtime: Runtime, limit: int = 100) -> int:
    """Queue again every queue-launched run that should be executing but that nobody alive holds: runs whose
    worker died, and queued runs whose message a broker restarted without its data has lost. Called when a
    training worker starts; duplicates are harmless (the lease admits one execution)."""
    now = utcnow()
    with runtime.db.session() as session:
        runs = session.scalars(
            select(TrainingRun)
            .where(TrainingRun.status.in_(ACTIVE_STATUSES), TrainingRun.launch == LAUNCH_QUEUE)
            .order_by(TrainingRun.seq)
            .limit(limit)
        ).all()
        orphans = [run.id for run in runs if not _lease_alive(run, now)]
        for run_id in orphans:
            dispatch(runtime, session, run_id)
    if orphans:
        log.info("runs_recovered", count=len(orphans), run_ids=orphans[:20])
    return len(orphans)
