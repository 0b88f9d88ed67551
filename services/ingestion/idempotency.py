"""`Idempotency-Key`: a retried request returns the first response, with no second side effect.

The key is claimed (a unique row per tenant and key) before the work starts, so two concurrent requests
with one key cannot both run. Only a completed 2xx response is kept; a failed attempt releases the key so
that the retry can do the work. Reusing a key for a different request is refused.

Two bounds keep a key from blocking forever:

- a claim whose request died mid-flight (its process was killed: nothing released it) is taken over by the
  first retry after `IDEMPOTENCY_IN_PROGRESS_SECONDS`; until then a retry gets 409 with `Retry-After`. The
  takeover is one conditional UPDATE (only one retry wins), and the claim's time is its fencing token: a request
  that was only slow, not dead, and finishes after being taken over neither records its answer nor releases the
  key (what it stored is deduplicated by content like any other push);
- a completed key is replayed for `IDEMPOTENCY_RETENTION_HOURS`; after that it is forgotten (a reuse is a new
  request) and rows past the window are purged, a bounded batch at a time, when keys are claimed.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from services.ingestion.models import IdempotencyRecord, utcnow
from shared.errors import BadRequest, Conflict
from shared.logging import get_logger
from shared.runtime import Runtime

log = get_logger(__name__)

MAX_KEY_LENGTH = 200
PURGE_BATCH = 500
PURGE_INTERVAL_SECONDS = 60.0
"""Each process purges expired keys at most this often (one bounded DELETE), off the common path."""
_last_purge: dict[int, float] = {}


class InProgress(Conflict):
    def __init__(self, retry_after: int) -> None:
        super().__init__(
            "a request with this Idempotency-Key is still in progress; retry shortly",
            {"retry_after_seconds": retry_after},
            code="idempotency_in_progress",
        )
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _bounds(runtime: Runtime) -> tuple[timedelta, timedelta]:
    settings = runtime.settings
    return (
        timedelta(seconds=settings.idempotency_in_progress_seconds),
        timedelta(hours=settings.idempotency_retention_hours),
    )


def run_once(
    runtime: Runtime, tenant: str, key: str | None, request_identity: bytes, work: Callable[[], dict[str, Any]]
) -> tuple[dict[str, Any], bool]:
    """Do `work` once per (tenant, key); returns (response body, replayed?)."""
    if key is None:
        return work(), False
    key = key.strip()
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise BadRequest(f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} printable characters")
    request_hash = hashlib.sha256(request_identity).hexdigest()
    claim, replay = _claim(runtime, tenant, key, request_hash)
    if replay is not None:
        return replay, True
    try:
        response = work()
    except BaseException:
        with runtime.db.session() as session:
            session.execute(delete(IdempotencyRecord).where(*_ours(tenant, key, claim)))
        raise
    with runtime.db.session() as session:
        stored = session.execute(
            update(IdempotencyRecord).where(*_ours(tenant, key, claim)).values(response=response, status=200)
        )
    if stored.rowcount == 0:
        log.warning("idempotency_claim_lost", key=key, claimed_at=claim.isoformat())
    return response, False


def _ours(tenant: str, key: str, claim: datetime) -> tuple[Any, ...]:
    return (IdempotencyRecord.tenant == tenant, IdempotencyRecord.key == key, IdempotencyRecord.created_at == claim)


def _claim(runtime: Runtime, tenant: str, key: str, request_hash: str) -> tuple[datetime, dict[str, Any] | None]:
    """Claim the key (returns the claim's time) or find its finished response to replay."""
    in_progress, retention = _bounds(runtime)
    while True:
        now = utcnow()
        try:
            with runtime.db.session() as session:
                session.add(IdempotencyRecord(tenant=tenant, key=key, request_hash=request_hash, created_at=now))
            _purge(runtime, now - retention)
            return now, None
        except IntegrityError:
            pass
        with runtime.db.session() as session:
            record = session.scalar(
                select(IdempotencyRecord).where(IdempotencyRecord.tenant == tenant, IdempotencyRecord.key == key)
            )
        if record is None:  # released by a failed attempt (or purged) between our insert and this read
            continue
        claimed = _aware(record.created_at)
        if record.response is not None and now - claimed >= retention:
            if _take_over(runtime, record, request_hash, now):  # forgotten: this is a new request
                return now, None
            continue  # another request took it over first: look again
        if record.request_hash != request_hash and (record.response is not None or now - claimed < in_progress):
            raise Conflict("this Idempotency-Key was used for a different request", {"key": key})
        if record.response is not None:
            return claimed, record.response
        if now - claimed < in_progress:
            raise InProgress(max(1, math.ceil((claimed + in_progress - now).total_seconds())))
        if _take_over(runtime, record, request_hash, now):
            log.warning("idempotency_claim_expired", key=key, claimed_at=claimed.isoformat())
            return now, None


def _take_over(runtime: Runtime, record: IdempotencyRecord, request_hash: str, now: datetime) -> bool:
    """Reclaim an expired row for this request; False if another retry got there first."""
    with runtime.db.session() as session:
        taken = session.execute(
            update(IdempotencyRecord)
            .where(IdempotencyRecord.id == record.id, IdempotencyRecord.created_at == record.created_at)
            .values(created_at=now, request_hash=request_hash, response=None, status=None)
        )
    return taken.rowcount == 1


def _purge(runtime: Runtime, before: datetime) -> None:
    """Drop a batch of keys past the retention window (finished ones; dead claims that old too)."""
    now = time.monotonic()
    interval = min(PURGE_INTERVAL_SECONDS, runtime.settings.idempotency_retention_hours * 3600)
    if now - _last_purge.get(id(runtime), -math.inf) < interval:
        return
    _last_purge[id(runtime)] = now
    with runtime.db.session() as session:
        expired = select(IdempotencyRecord.id).where(IdempotencyRecord.created_at < before).limit(PURGE_BATCH)
        ids = list(session.scalars(expired))
        if ids:
            session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.id.in_(ids)))
            log.info("idempotency_keys_purged", count=len(ids))
