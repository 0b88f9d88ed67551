"""Per-tenant limits on training runs: how many may wait in the queue, and how many may hold a worker at once.

- **Queued** (`max_queued_runs_per_tenant`): a run request through the API beyond it is refused with 429
  `too_many_runs` before anything is written; the caller retries once one of its runs has started. A
  `training.requested` event is never refused: it has no caller to answer, and retrying it would turn it
  into a dead letter whenever the queue stays full longer than the event's retries last (runs take minutes).
  Its run is recorded and waits its turn like any other; it costs a row, not compute.
- **Running** (`max_running_runs_per_tenant`): a tenant's runs that are sent to the training queue (sent and
  not yet started, or executing) count against it. A run beyond it is recorded as queued but not sent; it
  is sent, oldest first, in the transaction that ends one of the tenant's runs (and by every worker's sweep,
  should that ever be missed). Runs launched outside the queue (`launch: external`) count while they run.

Counting and admitting happen under a per-tenant lock: on PostgreSQL a transaction-scoped advisory lock,
on SQLite the database's one writer (every write transaction begins IMMEDIATE). Two requests of one tenant
that race for its last queue place are served one after the other: one is admitted, one gets 429.
"""

from __future__ import annotations

import hashlib

from sqlalchemy import and_, func, or_, select, text
from sqlalchemy.orm import Session

from services.training.config import MAX_QUEUED, TrainingConfig
from services.training.models import CANCELLING, LAUNCH_QUEUE, QUEUED, RUNNING, TrainingRun
from shared.errors import RateLimited

RETRY_AFTER_SECONDS = 30
"""What a refused caller is told to wait: about the time a queued run takes to start."""


class TooManyRuns(RateLimited):
    code = "too_many_runs"


def tenant_lock_key(tenant: str) -> int:
    """The PostgreSQL advisory lock key of one tenant's runs (a signed 64-bit number, stable across processes)."""
    digest = hashlib.sha256(f"training-runs:{tenant}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def lock_tenant(session: Session, tenant: str) -> None:
    """Serialize the decisions about one tenant's runs until the caller's transaction ends."""
    if session.get_bind().dialect.name == "postgresql":
        with session.no_autoflush:  # take the lock before this transaction writes (and locks) anything else
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": tenant_lock_key(tenant)})


def queued_count(session: Session, tenant: str) -> int:
    statement = select(func.count()).where(TrainingRun.tenant == tenant, TrainingRun.status == QUEUED)
    return session.scalar(statement) or 0


def in_flight_count(session: Session, tenant: str) -> int:
    """The tenant's runs holding a running slot: executing, or sent to the training queue and not yet started."""
    sent = and_(
        TrainingRun.status == QUEUED, TrainingRun.launch == LAUNCH_QUEUE, TrainingRun.dispatched_at.is_not(None)
    )
    statement = select(func.count()).where(
        TrainingRun.tenant == tenant, or_(TrainingRun.status.in_((RUNNING, CANCELLING)), sent)
    )
    return session.scalar(statement) or 0


def free_slots(session: Session, tenant: str, config: TrainingConfig) -> int | None:
    """How many more of the tenant's runs may be sent to the queue now (None: no limit). Call under the lock."""
    limit = config.max_running_runs_per_tenant
    if limit <= 0:
        return None
    return max(limit - in_flight_count(session, tenant), 0)


def admit(session: Session, tenant: str, config: TrainingConfig) -> None:
    """Raise TooManyRuns if the tenant's queue is full. Call under the lock, before writing the run."""
    limit = config.max_queued_runs_per_tenant
    if limit <= 0:
        return
    queued = queued_count(session, tenant)
    if queued >= limit:
        raise TooManyRuns(
            f"tenant {tenant} already has {queued} training runs queued, the most {MAX_QUEUED} allows; "
            f"retry once one of them has started, or cancel one",
            {"limit": MAX_QUEUED, "value": limit, "tenant": tenant},
            retry_after=RETRY_AFTER_SECONDS,
        )
