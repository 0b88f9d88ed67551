"""A run's life in the database: requested, leased, making progress, and ended exactly once.

- **Requests are idempotent.** An identical request (tenant, dataset, snapshot, model name, base model,
  hyper-parameters) while one is queued, running or succeeded returns that run (`active_key` is unique);
  a failed or cancelled run clears its key, so the same request can be tried again.
- **Sending waits for a slot.** A queue-launched run is sent to the training queue (`dispatch`) only while
  its tenant has a running slot free (`limits.py`); otherwise it waits, recorded as queued, and is sent,
  oldest first, in the transaction that ends another of the tenant's runs.
- **Executing needs the lease.** Whoever executes a run (the worker's `training.run` task, or rank 0 of a
  torchrun job) first takes its lease: `lease_owner` = host:pid:token, renewed by a heartbeat every few
  seconds until `lease_expires_at` (TRAINING_LEASE_SECONDS ahead). A redelivered task that finds the lease
  alive does not train; it tries again later (`Outcome.HELD`), and takes over only once the holder is gone:
  its lease expired, or it was a process on this host that no longer exists (a SIGKILLed worker).
- **A dead holder's run is queued again** by whichever live worker sweeps first (`requeue_orphans`, every few
  seconds in every training worker, and when one starts), without waiting for the broker to redeliver the
  dead worker's message. The requeue is a compare-and-set on the row as the sweep saw it, so two sweeps
  queue it once; the next execution takes the lease and resumes from the last checkpoint.
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

from services.training import limits
from services.training.config import MAX_RUNNING, TrainingConfig
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
    search: dict[str, Any] | None = None

    def key(self) -> str:
        identity: list[Any] = [
            self.tenant,
            self.dataset_id,
            self.snapshot_id,
            self.model_name,
            self.base_model,
            self.hyperparameters,
        ]
        if self.search is not None:  # a search is another request; a plain one keeps the key it always had
            identity.append(self.search)
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
    search: dict[str, Any] | None = None

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
            search=dict(run.search) if run.search is not None else None,
        )


def new_run_id() -> str:
    return f"run_{uuid.uuid4().hex[:20]}"


def _aware(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every time here is UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


# ------------------------------------------------------------------------------------------- requesting


def find_identical(session: Session, request: RunRequest) -> TrainingRun | None:
    """The identical run that is queued, running or succeeded, if there is one."""
    return session.scalar(select(TrainingRun).where(TrainingRun.active_key == request.key()))


def create_run(session: Session, request: RunRequest, *, force: bool = False) -> TrainingRun:
    """Record a queued run (not yet sent to the queue). Unless `force`d, it takes the request's dedupe key:
    look for an identical run first (`find_identical`)."""
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
        active_key=None if force else request.key(),
        status=QUEUED,
        cancel_requested=False,
        attempts=0,
        world_size=1,
        epochs=request.hyperparameters.get("epochs", 0),
        history=[],
        search=None if request.search is None else {"settings": request.search, "state": "waiting"},
    )
    session.add(run)
    session.flush()
    return run


def record_rejected(runtime: Runtime, session: Session, request: RunRequest, reason: str) -> TrainingRun:
    """A request that cannot run (bad hyper-parameters, unknown base model): a failed run, and its event."""
    run = create_run(session, request, force=True)
    _finish(runtime, session, run, FAILED, reason)
    return run


def dispatch(runtime: Runtime, session: Session, run: TrainingRun) -> None:
    """Queue the run for the training worker through the outbox, in the caller's transaction: it is sent when
    that transaction commits, or by the outbox relay once Redis answers again (by task name: the API process
    never imports torch)."""
    runtime.bus.enqueue(session, RUN_TASK, [run.id], queue=RUN_QUEUE)
    run.dispatched_at = utcnow()
    log.info("run_dispatched", run_id=run.id)


def dispatch_waiting(runtime: Runtime, session: Session, tenant: str) -> list[str]:
    """Send the tenant's waiting runs to the queue, oldest first, while it has running slots free; in the
    caller's transaction, under the tenant's lock. Returns the ids sent."""
    limits.lock_tenant(session, tenant)
    free = limits.free_slots(session, tenant, TrainingConfig.of(runtime.settings))
    if free == 0:
        return []
    statement = (
        select(TrainingRun)
        .where(
            TrainingRun.tenant == tenant,
            TrainingRun.status == QUEUED,
            TrainingRun.launch == LAUNCH_QUEUE,
            TrainingRun.dispatched_at.is_(None),
            TrainingRun.cancel_requested.is_(False),
        )
        .order_by(TrainingRun.seq)
        # A waiting run being cancelled right now is skipped, not waited for: its canceller may be queued on
        # this tenant's lock (PostgreSQL; SQLite has one writer and ignores it).
        .with_for_update(skip_locked=True)
    )
    waiting = session.scalars(statement if free is None else statement.limit(free)).all()
    for run in waiting:
        dispatch(runtime, session, run)
    return [run.id for run in waiting]


def waiting_for_slot(runtime: Runtime, run: TrainingRun) -> None:
    """Say why a queued run was not sent to the queue."""
    config = TrainingConfig.of(runtime.settings)
    log.info("run_waiting_for_slot", run_id=run.id, limit=MAX_RUNNING, value=config.max_running_runs_per_tenant)


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
    # Live before the lease is even written: this process's own sweep must never take the run for orphaned.
    with _LIVE_LOCK:
        _LIVE_OWNERS.add(owner)
    try:
        claimed = _claim(runtime, run_id, owner, world_size)
    except BaseException:
        forget_owner(owner)
        raise
    if claimed.outcome != "acquired":
        forget_owner(owner)
    return claimed


def _claim(runtime: Runtime, run_id: str, owner: str, world_size: int) -> Claim:
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
        run.lease_expires_at = now + timedelta(seconds=TrainingConfig.of(runtime.settings).lease_seconds)
        run.status = RUNNING
        run.attempts += 1
        run.world_size = world_size
        run.started_at = run.started_at or now
        info = RunInfo.of(run)
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
        self.config = TrainingConfig.of(runtime.settings)
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
        while not self._stop.wait(self.config.heartbeat_seconds):
            try:
                self.beat()
            except Exception as exc:  # a missed beat is survivable until the lease expires
                log.warning("run_heartbeat_failed", run_id=self.run_id, error=str(exc)[:300])

    def beat(self) -> None:
        with self.runtime.db.session() as session:
            renewed = session.execute(
                update(TrainingRun)
                .where(TrainingRun.id == self.run_id, TrainingRun.lease_owner == self.owner)
                .values(
                    lease_expires_at=utcnow() + timedelta(seconds=self.config.lease_seconds), **self.progress.values()
                )
            ).rowcount
            cancel = session.scalar(select(TrainingRun.cancel_requested).where(TrainingRun.id == self.run_id))
        if not renewed:
            self.lost.set()
        if cancel:
            self.cancelled.set()


# ----------------------------------------------------------------------------------------------- progress


def held_run(session: Session, run_id: str, owner: str) -> TrainingRun | None:
    run = session.scalar(select(TrainingRun).where(TrainingRun.id == run_id).with_for_update())
    if run is None or run.lease_owner != owner or run.status not in (RUNNING, CANCELLING):
        return None
    return run


def record_start(runtime: Runtime, run_id: str, owner: str, **values: Any) -> bool:
    with runtime.db.session() as session:
        run = held_run(session, run_id, owner)
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
        run = held_run(session, run_id, owner)
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
        run.lease_expires_at = utcnow() + timedelta(seconds=TrainingConfig.of(runtime.settings).lease_seconds)
    return True


# ------------------------------------------------------------------------------------------------- ending


def complete(runtime: Runtime, run_id: str, owner: str, *, payload: dict[str, Any], metrics: dict[str, Any]) -> str:
    """Mark the run succeeded and publish `training.completed`, atomically. Returns the status it ended in
    (a cancellation that arrived during export wins) or "" if this execution no longer holds the run."""
    with runtime.db.session() as session:
        run = held_run(session, run_id, owner)
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
            run = held_run(session, run_id, owner)
        if run is None:
            return False
        _finish(runtime, session, run, FAILED, reason)
    return True


def cancelled(runtime: Runtime, run_id: str, owner: str, reason: str) -> bool:
    with runtime.db.session() as session:
        run = held_run(session, run_id, owner)
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
    usage = compute_usage(run)
    if usage is not None:
        usage_event = {"source": "training", "records": [usage]}
        runtime.bus.publish(session, "usage.recorded", usage_event, tenant=run.tenant, trace_id=run.trace_id)
    log.info(f"run_{status}", run_id=run.id, reason=reason)
    dispatch_waiting(runtime, session, run.tenant)  # the slot this run held (if any) goes to the next in line


def compute_usage(run: TrainingRun) -> dict[str, Any] | None:
    """The finished run's compute as one usage record (none for a run that never started): device-seconds from
    its first start to its end, times its world size, on a GPU (`cuda...`) or CPU meter. Its id is the run's: a
    run finishes once, and a redelivered event counts once."""
    started, finished = _aware(run.started_at), _aware(run.finished_at)
    if started is None or finished is None:
        return None
    device = run.device or "cpu"
    meter = "training_gpu_seconds" if device.startswith("cuda") else "training_cpu_seconds"
    seconds = max(0.0, (finished - started).total_seconds()) * max(1, run.world_size or 1)
    return {
        "id": f"{run.id}.compute",
        "meter": meter,
        "subject": run.tenant,
        "time": finished.isoformat(),
        "value": round(seconds, 3),
        "dimensions": {"model": run.model_name, "device": device, "run_id": run.id, "dataset_id": run.dataset_id},
    }


# ----------------------------------------------------------------------------------------------- recovery

WORKER_GONE = "worker_gone"
"""The lease holder was a process on this host that no longer runs (detected at once)."""
LEASE_EXPIRED = "lease_expired"
"""The lease was not renewed in time: its holder died, hung, or lost the database for a whole lease."""
RELEASED = "released"
"""Nobody holds the run: an attempt gave it back (a transient error), or it was queued again, and no
execution has taken it since."""


def _orphaned(run: TrainingRun, now: datetime, released_for: float) -> str | None:
    """Why a running run needs sending again, or None while an execution may still hold (or take) it."""
    if run.lease_owner is not None:
        if _owner_gone(run.lease_owner):
            return WORKER_GONE
        expires = _aware(run.lease_expires_at)
        return LEASE_EXPIRED if expires is None or expires <= now else None
    untouched = now - (_aware(run.updated_at) or now)
    return RELEASED if untouched >= timedelta(seconds=released_for) else None


def requeue_orphans(runtime: Runtime, *, released_for: float, limit: int = 100) -> list[str]:
    """Queue again every queue-launched running run whose execution is gone (see `_orphaned`); a run nobody
    holds counts once it has stayed untouched for `released_for` seconds (longer than any retry of a released
    attempt waits, in the periodic sweep; 0 when a worker starts). Returns the ids it queued."""
    now = utcnow()
    with runtime.db.read_session() as session:
        running = session.scalars(
            select(TrainingRun)
            .where(TrainingRun.status.in_((RUNNING, CANCELLING)), TrainingRun.launch == LAUNCH_QUEUE)
            .order_by(TrainingRun.seq)
            .limit(limit)
        ).all()
    requeued = []
    for run in running:
        reason = _orphaned(run, now, released_for)
        if reason is not None and _requeue(runtime, run, reason):
            requeued.append(run.id)
    return requeued


def _requeue(runtime: Runtime, seen: TrainingRun, reason: str) -> bool:
    """Send the run again if its row is still as `seen`: not renewed by its holder, not taken by a new
    execution, not queued again by another sweep since (each of those changes `updated_at`)."""
    owner = TrainingRun.lease_owner
    with runtime.db.session() as session:
        taken = session.execute(
            update(TrainingRun)
            .where(
                TrainingRun.id == seen.id,
                TrainingRun.updated_at == seen.updated_at,
                owner.is_(None) if seen.lease_owner is None else owner == seen.lease_owner,
            )
            .values(lease_owner=None, lease_expires_at=None, dispatched_at=utcnow())
            .execution_options(synchronize_session=False)
        ).rowcount
        if taken:
            runtime.bus.enqueue(session, RUN_TASK, [seen.id], queue=RUN_QUEUE)
    if taken:
        expires = _aware(seen.lease_expires_at)
        log.info(
            "run_requeued",
            run_id=seen.id,
            tenant=seen.tenant,
            trace_id=seen.trace_id,
            reason=reason,
            previous_owner=seen.lease_owner,
            lease_expires_at=expires.isoformat() if expires else None,
            attempts=seen.attempts,
        )
    return bool(taken)


def dispatch_all_waiting(runtime: Runtime) -> list[str]:
    """Fill every tenant's free running slots with its waiting runs (each tenant in its own transaction)."""
    with runtime.db.read_session() as session:
        tenants = session.scalars(
            select(TrainingRun.tenant)
            .where(
                TrainingRun.status == QUEUED,
                TrainingRun.launch == LAUNCH_QUEUE,
                TrainingRun.dispatched_at.is_(None),
            )
            .distinct()
        ).all()
    sent = []
    for tenant in tenants:
        with runtime.db.session() as session:
            sent += dispatch_waiting(runtime, session, tenant)
    return sent


def recover(runtime: Runtime, limit: int = 100) -> int:
    """When a training worker starts: queue again every run that should be executing but that nobody alive
    holds, and every run sent to the queue but not started (a broker restarted without its data may have lost
    its message; a duplicate is harmless, the lease admits one execution); then fill free running slots."""
    requeued = requeue_orphans(runtime, released_for=0, limit=limit)
    with runtime.db.session() as session:
        sent = session.scalars(
            select(TrainingRun)
            .where(
                TrainingRun.status == QUEUED,
                TrainingRun.launch == LAUNCH_QUEUE,
                TrainingRun.dispatched_at.is_not(None),
            )
            .order_by(TrainingRun.seq)
            .limit(limit)
        ).all()
        for run in sent:
            dispatch(runtime, session, run)
    recovered = requeued + [run.id for run in sent] + dispatch_all_waiting(runtime)
    if recovered:
        log.info("runs_recovered", count=len(recovered), run_ids=recovered[:20])
    return len(recovered)
