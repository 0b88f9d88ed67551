"""`Idempotency-Key`: a retried request returns the first response, with no second side effect.

The key is claimed (a unique row per tenant and key) before the work starts, so two concurrent requests
with one key cannot both run. Only a completed 2xx response is kept; a failed attempt releases the key so
that the retry can do the work. Reusing a key for a different request is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from services.ingestion.models import IdempotencyRecord
from shared.errors import BadRequest, Conflict
from shared.runtime import Runtime

MAX_KEY_LENGTH = 200


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
    try:
        with runtime.db.session() as session:
            session.add(IdempotencyRecord(tenant=tenant, key=key, request_hash=request_hash))
    except IntegrityError:
        with runtime.db.session() as session:
            record = session.scalar(
                select(IdempotencyRecord).where(IdempotencyRecord.tenant == tenant, IdempotencyRecord.key == key)
            )
        if record is None:  # released by a failed attempt between our insert and this read
            return run_once(runtime, tenant, key, request_identity, work)
        if record.request_hash != request_hash:
            raise Conflict("this Idempotency-Key was used for a different request", {"key": key}) from None
        if record.response is None:
            raise Conflict("a request with this Idempotency-Key is still in progress; retry shortly") from None
        return record.response, True
    try:
        response = work()
    except BaseException:
        with runtime.db.session() as session:
            session.execute(
                delete(IdempotencyRecord).where(IdempotencyRecord.tenant == tenant, IdempotencyRecord.key == key)
            )
        raise
    with runtime.db.session() as session:
        record = session.scalar(
            select(IdempotencyRecord).where(IdempotencyRecord.tenant == tenant, IdempotencyRecord.key == key)
        )
        record.response = response
        record.status = 200
    return response, False
